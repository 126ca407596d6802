"""The Arena (DEMOS 18): blind side-by-side battles between two chat models, votes, and a leaderboard
fitted on the votes the way LMArena does (backend.arena.ratings). backend.arena.battles is the service
the Arena tab and /api/arena call."""

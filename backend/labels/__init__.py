"""Label services: SFT demonstrations, ranking sets and their queue, agreement, progress,
JSONL exports/imports and immutable dataset snapshots. The REST API, the UI and the CLIs call these.

Every function takes the Database (and the acting CurrentUser for writes); role checks happen in
the HTTP layer (backend/auth.py) and again here for ownership (an annotator edits only their own demos).
"""

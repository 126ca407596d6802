"""Progress of a ranking set: items done, and what each annotator has ranked or skipped."""
from __future__ import annotations

from sqlalchemy import func, select

from backend.db import Database
from backend.db.models import Ranking, RankingItem, User
from backend.labels.rankings import open_set


def set_progress(db: Database, set_id: int) -> dict:
    with db.read() as s:
        rs = open_set(s, set_id)
        n_items = s.scalar(select(func.count()).where(RankingItem.set_id == set_id))
        ranked = (select(RankingItem.id, func.count(Ranking.id).filter(Ranking.skipped.is_(False)).label("n"))
                  .outerjoin(Ranking, Ranking.item_id == RankingItem.id).where(RankingItem.set_id == set_id)
                  .group_by(RankingItem.id).subquery())
        done = s.scalar(select(func.count()).select_from(ranked).where(ranked.c.n >= rs.annotators_per_item))
        per_user = s.execute(
            select(User.name, func.count(Ranking.id).filter(Ranking.skipped.is_(False)),
                   func.count(Ranking.id).filter(Ranking.skipped.is_(True)),
                   func.count(Ranking.id).filter(Ranking.all_bad.is_(True)), func.max(Ranking.updated_at))
            .join(Ranking, Ranking.user_id == User.id).join(RankingItem, RankingItem.id == Ranking.item_id)
            .where(RankingItem.set_id == set_id).group_by(User.name).order_by(User.name)).all()
    return {"set_id": set_id, "name": rs.name, "items": n_items, "items_done": done,
            "annotators_per_item": rs.annotators_per_item,
            "rankings_needed": n_items * rs.annotators_per_item,
            "annotators": [{"name": n, "ranked": r, "skipped": sk, "all_bad": ab,
                            "last_activity": last.isoformat() if last else None}
                           for n, r, sk, ab, last in per_user]}

"""Which imported rows exist for readers: the one place that decides it.

An import (backend.labels.exchange) writes its SFT demos and ranking sets with their normal status and the id of
its `imports` row. Such a row is visible only once its import is PUBLISHED; a row with no import (an annotator's,
or an operator's set) always is. So publishing an import of any size is one UPDATE of one row, and every reader
(lists, queues, item lookups, submits, exports, snapshots, progress, agreement, review) filters with `visible` or
checks `is_visible`. A ranking set's items, candidates and rankings are visible with their set.
"""
from __future__ import annotations

from sqlalchemy import exists, or_, select
from sqlalchemy.sql.elements import ColumnElement

from backend.db.models import Import, RankingSet, SFTDemo

STAGING, PUBLISHED, DROPPED = "staging", "published", "dropped"  # Import.state
_IMPORTS = Import.__table__


def visible(import_id) -> ColumnElement[bool]:
    """A WHERE clause for the rows whose `import_id` column is given: no import, or a published one.
    (A correlated EXISTS on the imports primary key: one index probe per row, and nothing to join.)"""
    return or_(import_id.is_(None),
               exists().where(_IMPORTS.c.id == import_id, _IMPORTS.c.state == PUBLISHED))


DEMO_VISIBLE = visible(SFTDemo.__table__.c.import_id)  # usable in ORM and Core queries over sft_demos
SET_VISIBLE = visible(RankingSet.__table__.c.import_id)  # ... over ranking_sets


def is_visible(s, import_id: int | None) -> bool:
    """The same rule for one row already loaded (`s`: a Session or Connection)."""
    return import_id is None or s.execute(select(_IMPORTS.c.state).where(_IMPORTS.c.id == import_id)).scalar() == PUBLISHED

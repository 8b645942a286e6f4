"""Teacher and fake score evaluated together for both SiD updates (``docs/engine.md``)."""
from sidfast.engine.scores import ScoreEngine, edm_noised

__all__ = ["ScoreEngine", "edm_noised"]

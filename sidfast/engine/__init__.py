"""Teacher and fake score behind one interface, for both SiD updates (``docs/engine.md``)."""
from sidfast.engine.scores import EagerScores, PhaseScores, ScoreEngine, edm_noised

__all__ = ["ScoreEngine", "EagerScores", "PhaseScores", "edm_noised"]

"""Data layer: source formats -> canonical dataset directory -> per-user timelines."""

from pinnerformer.data.dataset import Dataset
from pinnerformer.data.timelines import Timeline, Timelines, TimelineView

__all__ = ["Dataset", "Timeline", "Timelines", "TimelineView"]

"""anechain: fused, stateful, INT8 Core ML shards of Phi-4-mini for the Apple Neural Engine."""

__version__ = "0.1.0"

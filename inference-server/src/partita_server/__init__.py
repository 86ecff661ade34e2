"""Partita inference server: one model stage or shard behind the Open Inference Protocol (v2)."""

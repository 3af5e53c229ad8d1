"""Committed rows -> GLaMM samples (``convert``), tagged conversations (``conversation``),
pixels from the source shards (``images``) and a PyTorch Dataset (``dataset``)."""

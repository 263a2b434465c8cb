"""A model over labelled crops: crops decoded once and batched, checked logits, speed."""

"""Picture files: one decoder, crop geometry, letterbox, Open Images layout, camera conditions."""

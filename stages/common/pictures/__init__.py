"""Picture files: one decoder, crop geometry and letterbox, the Open Images file layout."""

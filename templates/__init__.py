"""The template cache: backbone outputs computed once per image and shared by training, validation and the sweep."""

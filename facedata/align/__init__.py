"""Face alignment: from photographs as downloaded to the 112x112 five-point-aligned crops the backbones expect."""

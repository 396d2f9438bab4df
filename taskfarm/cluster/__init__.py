"""Starting controllers and engines as processes (`taskfarm cluster`)."""

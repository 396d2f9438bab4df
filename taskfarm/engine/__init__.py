"""The engine: a process that runs user code for the controller."""

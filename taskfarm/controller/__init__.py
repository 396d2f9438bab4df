"""The controller: engine registry, scheduler and the client interfaces."""

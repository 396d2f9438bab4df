"""The Foolscap boundary: the only package of taskfarm that imports foolscap.

It adapts Foolscap to `taskfarm.interfaces` and holds no policy (no
retries, back-off or batching).  `schemas` declares the wire
(RemoteInterfaces, each Referenceable's size limit), `tub` makes Tubs and
furl files, `server` and `multiengine` adapt the controller's services to
Referenceables (answering through `answers`), `client` is a client's
transport to a controller interface, `engine` an engine's transport to its
controller, and `sweeper` collects the reference cycles Foolscap leaves
around received messages.
"""

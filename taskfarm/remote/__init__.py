"""The Foolscap boundary: the only package of taskfarm that imports foolscap.

`schemas` declares the wire (RemoteInterfaces with size limits), `tub`
makes Tubs and furl files, `server` adapts the controller's services to
Referenceables, `client` is a client's link to a controller interface, and
`engine_link` is an engine's link to its controller, and `sweeper` collects
the reference cycles Foolscap leaves around received messages.
"""

"""taskfarm: farm Python tasks over engine processes, Twisted and Foolscap inside.

Importing taskfarm starts nothing; `taskfarm.client` is the blocking API and
`taskfarm.asyncclient` the Deferred one.
"""

__version__ = "0.1.0"

"""twistd plugins: ``twistd -n taskcontroller`` and ``twistd -n taskengine``."""

from twisted.application.service import ServiceMaker

taskcontroller = ServiceMaker(
    "taskfarm controller",
    "taskfarm.controller.tap",
    "The taskfarm controller: engines register with it, clients farm tasks through it.",
    "taskcontroller",
)

taskengine = ServiceMaker(
    "taskfarm engine",
    "taskfarm.engine.tap",
    "A taskfarm engine: runs code for the controller in a persistent namespace.",
    "taskengine",
)

"""The names of graphdriver's confined jobs (``"module:function"``, run by :mod:`.confine`), for
a caller that starts a job's child before it knows the job will run (the command's
``apply``/``import``: :func:`.confine.prespawn`, then the driver's apply hook runs the job).

A leaf: it imports nothing (importing it costs nothing), and it owns only the names; each job
lives in its own module.
"""

#: the Linux layer apply (:func:`graphdriver.archive.isolate.apply_job`)
LINUX_APPLY = "graphdriver.archive.isolate:apply_job"

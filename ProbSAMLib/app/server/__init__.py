"""``probsam serve``: the Slicer worker's sample jobs over HTTP (FastAPI + uvicorn, the ``[server]`` extra).

One concept a module: ``protocol`` (paths, headers, versions; shared with the stdlib client
ProbSAMLib.app.remote), ``security`` (start-up exposure rules, token, rate limit), ``model`` (the one
model served), ``jobqueue`` (the GPU thread and the bounded backlog), ``app`` (the routes), ``command``
(the ``serve`` options). Nothing here is imported by ``import ProbSAMLib``. See docs/SERVER.md.
"""

"""The local shading service (`pbnds serve`): HTTP API in app.py, job queue in jobs.py, access
control and the discovery file in security.py. docs/service-api.md is the contract."""

"""digestfs for Pants' BSP server, as a plugin: `backend_packages = [..., "pants_digestfs"]`.

`register.py` is the backend, `rules.py` its seam, `versions.py` its probes of the running Pants;
`digestfs.py`, `seam.py` and `digestfs_client.py` import nothing from Pants.
"""

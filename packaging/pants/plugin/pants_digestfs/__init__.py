"""digestfs for Pants' BSP server, as a plugin: `backend_packages = [..., "pants_digestfs"]`.

`register.py` is the backend; `digestfs.py` and `digestfs_client.py` import nothing from Pants
(the patch in packaging/pants/ vendors them as they are).
"""

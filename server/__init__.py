"""The HTTP front end (aiohttp) and the ``blockserve`` command line."""

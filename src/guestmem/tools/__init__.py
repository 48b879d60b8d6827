"""Front ends on the library: the ``guestmem`` command, ``info``, ``bench``, the demo image.

The library's own modules never import from here.
"""

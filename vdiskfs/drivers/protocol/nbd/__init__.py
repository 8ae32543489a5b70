"""Protocol driver ``nbd``: a Network Block Device client on trio sockets.

:mod:`.wire` packs and parses the messages, :mod:`.uri` parses ``nbd://`` URIs.
"""

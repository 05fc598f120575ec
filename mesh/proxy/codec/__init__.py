"""Codecs: the bytes of a protocol on one side, and nothing else.

A codec parses what arrives and serializes what leaves; it talks to the
exchange (:mod:`mesh.proxy.exchange`) only through the stream interfaces of
:mod:`mesh.proxy.streams`, so that the exchange knows no protocol.

- :mod:`mesh.proxy.codec.http1_server`: HTTP/1.1 from clients (downstream)
- :mod:`mesh.proxy.codec.http1_client`: HTTP/1.1 to upstreams
- :mod:`mesh.proxy.codec.heads`: pure HTTP/1.1 head serializers
"""

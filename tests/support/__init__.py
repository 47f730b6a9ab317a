"""Helpers the tests start or drive: a fake Hub, a browser driver, a TCP forwarder, child-process runners."""

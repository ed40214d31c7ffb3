"""Port 0x80: POST codes are kept (the last one and a count), reads float high."""

from pykvm.devices.harness import PortHarness
from pykvm.devices.postcode import PostCode


def test_post_codes_are_remembered_and_reads_float_high():
    post = PostCode()
    bus = PortHarness(post)
    for code in (0x01, 0x02, 0x55):
        bus.out(0x80, code)
    assert (post.last, post.writes) == (0x55, 3)
    assert bus.inp(0x80) == 0xFF

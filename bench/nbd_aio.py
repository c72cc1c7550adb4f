"""NBD requests in flight from one libnbd connection, for A/B runs of the server's
request path (not a section of bench/run.py): 4 KiB requests at random offsets for SECS
seconds, keeping DEPTH in flight; MODE plain (writes), fua (writes with FUA) or mix
(a FLUSH every 8 requests, writes and reads otherwise). Prints requests per second.

    /usr/bin/python3 bench/nbd_aio.py 'nbd+unix:///A?socket=SOCK' DEPTH SECS MODE

Runs under Debian's python (python3-libnbd). Divide the daemon's CPU time
(/proc/PID/stat fields 14 + 15) over the run by the requests for CPU per request.
"""
import os
import random
import sys
import time

import nbd


def main() -> None:
    uri, depth, secs, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    h = nbd.NBD()
    h.connect_uri(uri)
    blocks = h.get_size() // 4096
    buf = nbd.Buffer.from_bytearray(bytearray(os.urandom(4096)))
    rnd = random.Random(1)
    done = n = 0
    t0 = time.time()
    while time.time() - t0 < secs:
        while h.aio_in_flight() < depth:
            off = rnd.randrange(blocks) * 4096
            n += 1
            if mode == "fua":
                h.aio_pwrite(buf, off, flags=nbd.CMD_FLAG_FUA)
            elif mode == "mix" and n % 8 == 0:
                h.aio_flush()
            elif mode == "mix" and n % 2 == 0:
                h.aio_pread(nbd.Buffer(4096), off)
            else:
                h.aio_pwrite(buf, off)
        h.poll(-1)
        while True:
            try:
                c = h.aio_peek_command_completed()
            except nbd.Error:        # none in flight
                break
            if not c:
                break
            h.aio_command_completed(c)
            done += 1
    print(f"{mode} d{depth}: {done / (time.time() - t0):.0f} ops/s")


if __name__ == "__main__":
    main()

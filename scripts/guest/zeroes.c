/* vdiskfs-zeroes: write-zeroes and discard on a block device, from the test guest.
 *
 * The test guest's static busybox has `blkdiscard` but no `blkdiscard -z` and no
 * `fallocate -p`, so nothing in it sends a virtio-blk WRITE_ZEROES request. This does, as
 * util-linux does:
 *
 *   vdiskfs-zeroes DEV MODE:OFFSET:LENGTH[,MODE:OFFSET:LENGTH...]...
 *
 *   punch    fallocate(PUNCH_HOLE | KEEP_SIZE): write zeroes that may deallocate
 *            (util-linux `fallocate -p`; WRITE_ZEROES with VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
 *   zero     ioctl(BLKZEROOUT): write zeroes, keep the blocks allocated
 *            (util-linux `blkdiscard -z`; WRITE_ZEROES without the flag)
 *   discard  ioctl(BLKDISCARD) (busybox `blkdiscard`; DISCARD)
 *
 * OFFSET and LENGTH in bytes, multiples of 512. Prints one line per operation and exits 1 at
 * the first that fails. The operations come as one word, as the kernel command line passes
 * them to init (scripts/guest/init.sh: vdiskfs.zeroes_ops=), so that the shell needs no
 * pipeline to split them. Built static by tests/emulator/test_boot_discard.py
 * (cc -static -Os -s).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

static int run(int fd, const char *mode, uint64_t offset, uint64_t length)
{
    uint64_t range[2] = {offset, length};

    if (strcmp(mode, "punch") == 0)
        return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset,
                         (off_t)length);
    if (strcmp(mode, "zero") == 0)
        return ioctl(fd, BLKZEROOUT, range);
    if (strcmp(mode, "discard") == 0)
        return ioctl(fd, BLKDISCARD, range);
    errno = EINVAL;
    return -1;
}

int main(int argc, char **argv)
{
    int fd, i;

    if (argc < 3) {
        fprintf(stderr, "usage: %s DEV punch|zero|discard:OFFSET:LENGTH[,...]...\n", argv[0]);
        return 2;
    }
    fd = open(argv[1], O_RDWR);
    if (fd < 0) {
        fprintf(stderr, "vdiskfs-zeroes: %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    for (i = 2; i < argc; i++) {
        char *save = NULL, *op;

        for (op = strtok_r(argv[i], ",", &save); op; op = strtok_r(NULL, ",", &save)) {
            char mode[16];
            unsigned long long offset, length;

            if (sscanf(op, "%15[a-z]:%llu:%llu", mode, &offset, &length) != 3) {
                fprintf(stderr, "vdiskfs-zeroes: bad operation '%s'\n", op);
                return 2;
            }
            if (run(fd, mode, offset, length) != 0) {
                fprintf(stderr, "vdiskfs-zeroes: %s %s %llu %llu: %s\n", argv[1], mode, offset,
                        length, strerror(errno));
                return 1;
            }
            printf("vdiskfs-zeroes: %s %s %llu %llu ok\n", argv[1], mode, offset, length);
        }
    }
    return close(fd) != 0;
}

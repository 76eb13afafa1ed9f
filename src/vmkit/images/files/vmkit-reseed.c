/* vmkit-reseed: give the kernel's RNG fresh entropy from the host and reseed it now.
 *
 * Reads up to 64 bytes from stdin, adds them to the input pool as credited entropy
 * (RNDADDENTROPY), then forces the CRNG to reseed (RNDRESEEDCRNG), so the next read of
 * /dev/urandom no longer follows the state a snapshot or a clone's source had. Writing to
 * /dev/urandom alone mixes bytes in but does not reseed. Needs CAP_SYS_ADMIN (the guest agent
 * runs it as root). Exit 0 on success; 1 with a message on stderr otherwise.
 *
 * Built static by vmkit's tiny image recipe: gcc -static -Os.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define MAX_BYTES 64

static int fail(const char *what)
{
	fprintf(stderr, "vmkit-reseed: %s: %s\n", what, strerror(errno));
	return 1;
}

int main(void)
{
	/* struct rand_pool_info ends in a flexible array: the bytes follow its header */
	union {
		struct rand_pool_info info;
		unsigned char raw[sizeof(struct rand_pool_info) + MAX_BYTES];
	} entropy;
	unsigned char *data = entropy.raw + sizeof(struct rand_pool_info);
	size_t have = 0;
	int fd;

	while (have < MAX_BYTES) {
		ssize_t n = read(STDIN_FILENO, data + have, MAX_BYTES - have);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return fail("reading stdin");
		}
		if (n == 0)
			break;
		have += (size_t)n;
	}
	if (have == 0) {
		fprintf(stderr, "vmkit-reseed: no bytes on stdin\n");
		return 1;
	}
	fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return fail("opening /dev/urandom");
	entropy.info.entropy_count = (int)(have * 8);
	entropy.info.buf_size = (int)have;
	if (ioctl(fd, RNDADDENTROPY, &entropy) < 0)
		return fail("RNDADDENTROPY");
	if (ioctl(fd, RNDRESEEDCRNG) < 0)
		return fail("RNDRESEEDCRNG");
	close(fd);
	return 0;
}

/* vmkit-reseed: give the kernel's RNG fresh entropy from the host and reseed it now.
 *
 * Reads up to 64 bytes from stdin, adds them to the input pool as credited entropy
 * (RNDADDENTROPY), then forces the CRNG to reseed (RNDRESEEDCRNG), so the next read of
 * /dev/urandom no longer follows the state a snapshot or a clone's source had. Writing to
 * /dev/urandom alone mixes bytes in but does not reseed. Needs CAP_SYS_ADMIN (the guest agent
 * runs it as root). Exit 0 on success; 1 with a message on stderr otherwise.
 *
 * `vmkit-reseed --identity HOSTNAME [MAC...]` first gives an instant clone its own identity,
 * in this one process (each program a clone starts costs 50-250 ms under TCG, its translated
 * code all gone): the hostname (kernel, and /etc/hostname when writable), each Ethernet NIC
 * backed by a device (not a bridge, veth or tunnel the guest made), in the order the kernel
 * registered them (ifindex: the PCI order of the VM's NIC slots; names sort eth10 before
 * eth2, enp10s0 before enp2s0), the next MAC (SIOCSIFHWADDR), and every udhcpc is told to
 * release its lease and ask again (SIGUSR2, SIGUSR1); then it prints "vmkit-identity: set"
 * (an older helper ignored the option: the host runs its shell version then). Exit 3 when the
 * hostname or a MAC could not be set (the reseed is not tried); every MAC is read before any
 * change.
 *
 * Built static by vmkit's tiny image recipe: gcc -static -Os.
 */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_BYTES 64
#define IDENTITY_FAILED 3

static int fail(const char *what)
{
	fprintf(stderr, "vmkit-reseed: %s: %s\n", what, strerror(errno));
	return 1;
}

static int identity_fail(const char *what, const char *which)
{
	fprintf(stderr, "vmkit-reseed: %s %s: %s\n", what, which, strerror(errno));
	return IDENTITY_FAILED;
}

static int parse_mac(const char *text, unsigned char mac[6])
{
	unsigned int b[6];
	char end;

	if (sscanf(text, "%2x:%2x:%2x:%2x:%2x:%2x%c", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5],
		   &end) != 6)
		return -1;
	for (int i = 0; i < 6; i++)
		mac[i] = (unsigned char)b[i];
	return 0;
}

/* A number read from /sys/class/net/NAME/WHAT; -1 when there is none (not a device). */
static long net_number(const char *name, const char *what)
{
	char path[300], text[32] = "";
	FILE *file;

	snprintf(path, sizeof(path), "/sys/class/net/%s/%s", name, what);
	file = fopen(path, "re");
	if (file == NULL)
		return -1;
	if (fgets(text, sizeof(text), file) == NULL)
		text[0] = '\0';
	fclose(file);
	return isdigit((unsigned char)text[0]) ? strtol(text, NULL, 10) : -1;
}

/* The VM's NICs: Ethernet and backed by a device (not lo, a tunnel, a bridge or veth the
 * guest made, or a file such as bonding_masters) */
static int vm_nic(const struct dirent *entry)
{
	char path[300];

	if (entry->d_name[0] == '.' || net_number(entry->d_name, "type") != ARPHRD_ETHER)
		return 0;
	snprintf(path, sizeof(path), "/sys/class/net/%s/device", entry->d_name);
	return access(path, F_OK) == 0;
}

static int by_ifindex(const struct dirent **a, const struct dirent **b)
{
	long x = net_number((*a)->d_name, "ifindex"), y = net_number((*b)->d_name, "ifindex");

	return (x > y) - (x < y);
}

static void renew_leases(void)
{
	DIR *proc = opendir("/proc");
	struct dirent *entry;

	if (proc == NULL)
		return;
	while ((entry = readdir(proc)) != NULL) {
		char path[300], comm[32] = "";
		FILE *file;

		if (!isdigit((unsigned char)entry->d_name[0]))
			continue;
		snprintf(path, sizeof(path), "/proc/%s/comm", entry->d_name);
		file = fopen(path, "re");
		if (file == NULL)
			continue;
		if (fgets(comm, sizeof(comm), file) != NULL && strcmp(comm, "udhcpc\n") == 0) {
			pid_t pid = (pid_t)atoi(entry->d_name);
			kill(pid, SIGUSR2); /* release */
			kill(pid, SIGUSR1); /* renew */
		}
		fclose(file);
	}
	closedir(proc);
}

static int identity(int count, char **args)
{
	const char *hostname = args[0];
	struct dirent **nics = NULL;
	unsigned char mac[6];
	int fd, n, next = 1;

	for (int i = 1; i < count; i++) { /* every argument checked before anything changes */
		if (parse_mac(args[i], mac) < 0) {
			errno = EINVAL;
			return identity_fail("reading the MAC", args[i]);
		}
	}
	if (sethostname(hostname, strlen(hostname)) < 0)
		return identity_fail("setting the hostname", hostname);
	fd = open("/etc/hostname", O_WRONLY | O_TRUNC | O_CLOEXEC | O_NOFOLLOW);
	if (fd >= 0) { /* best effort, as in a read-only root */
		if (write(fd, hostname, strlen(hostname)) < 0 || write(fd, "\n", 1) < 0)
			perror("vmkit-reseed: /etc/hostname");
		close(fd);
	}
	n = scandir("/sys/class/net", &nics, vm_nic, by_ifindex);
	if (n < 0)
		return identity_fail("listing", "/sys/class/net");
	fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return identity_fail("opening a socket for", "SIOCSIFHWADDR");
	for (int i = 0; i < n && next < count; i++, next++) {
		struct ifreq request;

		memset(&request, 0, sizeof(request));
		if (strlen(nics[i]->d_name) >= IFNAMSIZ) {
			errno = ENAMETOOLONG;
			return identity_fail("naming", nics[i]->d_name);
		}
		memcpy(request.ifr_name, nics[i]->d_name, strlen(nics[i]->d_name));
		request.ifr_hwaddr.sa_family = ARPHRD_ETHER;
		parse_mac(args[next], (unsigned char *)request.ifr_hwaddr.sa_data);
		if (ioctl(fd, SIOCSIFHWADDR, &request) < 0)
			return identity_fail("setting the MAC of", nics[i]->d_name);
	}
	close(fd);
	/* MACs left over belong to NICs the guest has not probed yet (a driver it lacks, a NIC
	 * hot-added a moment ago): such a NIC reads the clone's MAC from its device when it
	 * comes up, so they need nothing here */
	renew_leases();
	/* the host tells this helper from an older one, which ignored --identity */
	printf("vmkit-identity: set\n");
	fflush(stdout);
	return 0;
}

int main(int argc, char **argv)
{
	/* struct rand_pool_info ends in a flexible array: the bytes follow its header */
	union {
		struct rand_pool_info info;
		unsigned char raw[sizeof(struct rand_pool_info) + MAX_BYTES];
	} entropy;
	unsigned char *data = entropy.raw + sizeof(struct rand_pool_info);
	size_t have = 0;
	int fd;

	if (argc > 1) {
		int done;

		if (strcmp(argv[1], "--identity") != 0 || argc < 3) {
			fprintf(stderr, "usage: vmkit-reseed [--identity HOSTNAME [MAC...]] < bytes\n");
			return 2;
		}
		done = identity(argc - 2, argv + 2);
		if (done != 0)
			return done;
	}
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

/* faultshim: a syscall-level fault injector for the tests (LD_PRELOAD).
 *
 * Makes open/openat/creat, write/pwrite/writev/pwritev, fsync/fdatasync, close,
 * rename/renameat and read/pread on files whose path matches a pattern fail with a chosen
 * errno, on a chosen MPI rank, after N bytes or N calls -- so the error arises inside
 * Open MPI's I/O layer, HDF5 or Python's file objects exactly as a real ENOSPC/EIO would.
 *
 * Environment (read once, at the first intercepted call):
 *   FAULTSHIM_PATH   pattern: fnmatch(3) if it holds * ? or [, else a substring (required)
 *   FAULTSHIM_CALLS  comma list of open,write,sync,close,rename,read (default write)
 *   FAULTSHIM_ERRNO  ENOSPC, EIO, EDQUOT or a number (default ENOSPC)
 *   FAULTSHIM_RANK   a rank, a comma list of ranks, or "all" (default all); the rank is read
 *                    from OMPI_COMM_WORLD_RANK / PMIX_RANK / PMI_RANK; a process without one
 *                    (mpirun itself) is never faulted
 *   FAULTSHIM_AFTER_BYTES  fail a write once this many bytes were written to matching files
 *   FAULTSHIM_AFTER_CALLS  let this many matching calls (of the chosen kinds) succeed first
 *   FAULTSHIM_COUNT  how many calls fail (default: every one after the trigger; -1 likewise)
 *   FAULTSHIM_LOG    "0" silences the one line printed to stderr when a fault fires
 *   FAULTSHIM_GEN    any string: when it changes, the variables are read again and the
 *                    counters reset (many cases in one process; set it last)
 *
 * fds opened on matching paths are tracked, so write(fd)/fsync(fd)/close(fd) match.
 * Build: cc -shared -fPIC -O2 -o faultshim.so faultshim.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAXFD 65536
enum { K_OPEN = 1, K_WRITE = 2, K_SYNC = 4, K_CLOSE = 8, K_RENAME = 16, K_READ = 32 };

static int inited, active, kinds = K_WRITE, err_no = ENOSPC, quiet;
static long long after_bytes = -1, after_calls = 0, count = -1;
static long long bytes_seen, calls_seen, fired;
static char pattern[4096];
static int use_fnmatch;
static unsigned char tracked[MAXFD];
static int myrank = -1;

static int name2errno(const char *s) {
    if (!s || !*s) return ENOSPC;
    if (!strcmp(s, "ENOSPC")) return ENOSPC;
    if (!strcmp(s, "EIO")) return EIO;
    if (!strcmp(s, "EDQUOT")) return EDQUOT;
    if (!strcmp(s, "EACCES")) return EACCES;
    if (!strcmp(s, "EROFS")) return EROFS;
    return atoi(s);
}

static int rank_selected(const char *spec) {
    const char *r = getenv("OMPI_COMM_WORLD_RANK");
    if (!r) r = getenv("PMIX_RANK");
    if (!r) r = getenv("PMI_RANK");
    if (!r) return 0;
    myrank = atoi(r);
    if (!spec || !*spec || !strcmp(spec, "all")) return 1;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", spec);
    for (char *save, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save))
        if (atoi(t) == myrank) return 1;
    return 0;
}

static char gen[64];

/* (re)read the configuration: at the first call, and whenever FAULTSHIM_GEN changes (a test
 * process can then run many cases, setting the variables and bumping FAULTSHIM_GEN) */
static void init(void) {
    const char *g = getenv("FAULTSHIM_GEN");
    if (!g) g = "";
    if (inited && !strncmp(g, gen, sizeof gen - 1)) return;
    snprintf(gen, sizeof gen, "%s", g);
    if (inited) memset(tracked, 0, sizeof tracked);
    inited = 1;
    active = 0; kinds = K_WRITE; err_no = ENOSPC; after_bytes = -1; after_calls = 0;
    count = -1; bytes_seen = calls_seen = fired = 0;
    const char *p = getenv("FAULTSHIM_PATH");
    if (!p || !*p) return;
    snprintf(pattern, sizeof pattern, "%s", p);
    use_fnmatch = strpbrk(pattern, "*?[") != NULL;
    const char *c = getenv("FAULTSHIM_CALLS");
    if (c && *c) {
        kinds = 0;
        if (strstr(c, "open") || strstr(c, "create")) kinds |= K_OPEN;
        if (strstr(c, "write")) kinds |= K_WRITE;
        if (strstr(c, "sync")) kinds |= K_SYNC;
        if (strstr(c, "close")) kinds |= K_CLOSE;
        if (strstr(c, "rename")) kinds |= K_RENAME;
        if (strstr(c, "read")) kinds |= K_READ;
    }
    err_no = name2errno(getenv("FAULTSHIM_ERRNO"));
    const char *v;
    if ((v = getenv("FAULTSHIM_AFTER_BYTES")) && *v) after_bytes = atoll(v);
    if ((v = getenv("FAULTSHIM_AFTER_CALLS")) && *v) after_calls = atoll(v);
    if ((v = getenv("FAULTSHIM_COUNT")) && *v) count = atoll(v);
    quiet = (v = getenv("FAULTSHIM_LOG")) && !strcmp(v, "0");
    active = rank_selected(getenv("FAULTSHIM_RANK"));
}

static int matches(const char *path) {
    if (!path) return 0;
    if (use_fnmatch) return fnmatch(pattern, path, 0) == 0;
    return strstr(path, pattern) != NULL;
}

/* decide whether this call (of kind k, on a matching file, moving n bytes) fails */
static int should_fail(int k, const char *what, size_t n) {
    int chosen = (kinds & k) && (count < 0 || fired < count);
    if (k == K_WRITE && after_bytes >= 0 && (!chosen || bytes_seen + (long long)n <= after_bytes)) {
        bytes_seen += n;                 /* bytes count whichever calls are faulted */
        return 0;
    }
    if (!chosen) { if (k == K_WRITE) bytes_seen += n; return 0; }
    if (after_bytes >= 0 && k != K_WRITE && bytes_seen < after_bytes) return 0;
    if (calls_seen < after_calls) { calls_seen++; if (k == K_WRITE) bytes_seen += n; return 0; }
    fired++;
    if (!quiet) {
        struct timeval tv;
        gettimeofday(&tv, NULL);
        char line[512];
        int len = snprintf(line, sizeof line,
                           "faultshim: %s -> %s on rank %d (pattern '%s') t=%ld.%03ld\n",
                           what, strerror(err_no), myrank, pattern, (long)tv.tv_sec,
                           (long)(tv.tv_usec / 1000));
        ssize_t (*w)(int, const void *, size_t) = dlsym(RTLD_NEXT, "write");
        if (w && len > 0) w(2, line, (size_t)len);
    }
    errno = err_no;
    return 1;
}

static int fd_hit(int fd) { init(); return active && fd >= 0 && fd < MAXFD && tracked[fd]; }

#define REAL(ret, name, ...) \
    static ret (*real_##name)(__VA_ARGS__); \
    if (!real_##name) real_##name = (ret (*)(__VA_ARGS__))dlsym(RTLD_NEXT, #name)

static int track(int fd, const char *path) {
    if (fd >= 0 && fd < MAXFD) tracked[fd] = active && matches(path);
    return fd;
}

#define OPEN_BODY(name, CALL) \
    init(); \
    mode_t mode = 0; \
    if (flags & (O_CREAT | O_TMPFILE)) { va_list ap; va_start(ap, flags); mode = va_arg(ap, int); va_end(ap); } \
    if (active && matches(path) && should_fail(K_OPEN, name, 0)) return -1; \
    return track(CALL, path)

int open(const char *path, int flags, ...) {
    REAL(int, open, const char *, int, ...);
    OPEN_BODY("open", real_open(path, flags, mode));
}
int open64(const char *path, int flags, ...) {
    REAL(int, open64, const char *, int, ...);
    OPEN_BODY("open", real_open64(path, flags, mode));
}
int openat(int dirfd, const char *path, int flags, ...) {
    REAL(int, openat, int, const char *, int, ...);
    OPEN_BODY("openat", real_openat(dirfd, path, flags, mode));
}
int openat64(int dirfd, const char *path, int flags, ...) {
    REAL(int, openat64, int, const char *, int, ...);
    OPEN_BODY("openat", real_openat64(dirfd, path, flags, mode));
}
int creat(const char *path, mode_t mode) {
    REAL(int, creat, const char *, mode_t);
    init();
    if (active && matches(path) && should_fail(K_OPEN, "creat", 0)) return -1;
    return track(real_creat(path, mode), path);
}
int creat64(const char *path, mode_t mode) { return creat(path, mode); }

ssize_t write(int fd, const void *buf, size_t n) {
    REAL(ssize_t, write, int, const void *, size_t);
    if (fd_hit(fd) && should_fail(K_WRITE, "write", n)) return -1;
    return real_write(fd, buf, n);
}
ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    REAL(ssize_t, pwrite, int, const void *, size_t, off_t);
    if (fd_hit(fd) && should_fail(K_WRITE, "pwrite", n)) return -1;
    return real_pwrite(fd, buf, n, off);
}
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    REAL(ssize_t, pwrite64, int, const void *, size_t, off_t);
    if (fd_hit(fd) && should_fail(K_WRITE, "pwrite", n)) return -1;
    return real_pwrite64(fd, buf, n, off);
}
static size_t iovlen(const struct iovec *iov, int cnt) {
    size_t n = 0;
    for (int i = 0; i < cnt; i++) n += iov[i].iov_len;
    return n;
}
ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    REAL(ssize_t, writev, int, const struct iovec *, int);
    if (fd_hit(fd) && should_fail(K_WRITE, "writev", iovlen(iov, cnt))) return -1;
    return real_writev(fd, iov, cnt);
}
ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off) {
    REAL(ssize_t, pwritev, int, const struct iovec *, int, off_t);
    if (fd_hit(fd) && should_fail(K_WRITE, "pwritev", iovlen(iov, cnt))) return -1;
    return real_pwritev(fd, iov, cnt, off);
}
ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off_t off) {
    REAL(ssize_t, pwritev64, int, const struct iovec *, int, off_t);
    if (fd_hit(fd) && should_fail(K_WRITE, "pwritev", iovlen(iov, cnt))) return -1;
    return real_pwritev64(fd, iov, cnt, off);
}
ssize_t pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int fl) {
    REAL(ssize_t, pwritev2, int, const struct iovec *, int, off_t, int);
    if (fd_hit(fd) && should_fail(K_WRITE, "pwritev", iovlen(iov, cnt))) return -1;
    return real_pwritev2(fd, iov, cnt, off, fl);
}
ssize_t read(int fd, void *buf, size_t n) {
    REAL(ssize_t, read, int, void *, size_t);
    if (fd_hit(fd) && should_fail(K_READ, "read", 0)) return -1;
    return real_read(fd, buf, n);
}
ssize_t pread(int fd, void *buf, size_t n, off_t off) {
    REAL(ssize_t, pread, int, void *, size_t, off_t);
    if (fd_hit(fd) && should_fail(K_READ, "pread", 0)) return -1;
    return real_pread(fd, buf, n, off);
}
ssize_t pread64(int fd, void *buf, size_t n, off_t off) {
    REAL(ssize_t, pread64, int, void *, size_t, off_t);
    if (fd_hit(fd) && should_fail(K_READ, "pread", 0)) return -1;
    return real_pread64(fd, buf, n, off);
}
int fsync(int fd) {
    REAL(int, fsync, int);
    if (fd_hit(fd) && should_fail(K_SYNC, "fsync", 0)) return -1;
    return real_fsync(fd);
}
int fdatasync(int fd) {
    REAL(int, fdatasync, int);
    if (fd_hit(fd) && should_fail(K_SYNC, "fdatasync", 0)) return -1;
    return real_fdatasync(fd);
}
int close(int fd) {
    REAL(int, close, int);
    int hit = fd_hit(fd);
    if (fd >= 0 && fd < MAXFD) tracked[fd] = 0;
    int rc = real_close(fd);                 /* the fd is released either way, as the kernel does */
    if (hit && should_fail(K_CLOSE, "close", 0)) return -1;
    return rc;
}
int rename(const char *a, const char *b) {
    REAL(int, rename, const char *, const char *);
    init();
    if (active && (matches(a) || matches(b)) && should_fail(K_RENAME, "rename", 0)) return -1;
    return real_rename(a, b);
}
int renameat(int da, const char *a, int db, const char *b) {
    REAL(int, renameat, int, const char *, int, const char *);
    init();
    if (active && (matches(a) || matches(b)) && should_fail(K_RENAME, "renameat", 0)) return -1;
    return real_renameat(da, a, db, b);
}
int renameat2(int da, const char *a, int db, const char *b, unsigned fl) {
    REAL(int, renameat2, int, const char *, int, const char *, unsigned);
    init();
    if (active && (matches(a) || matches(b)) && should_fail(K_RENAME, "renameat", 0)) return -1;
    return real_renameat2(da, a, db, b, fl);
}

// Keeps one large freed block of the C heap for the next large allocation, so that a training
// step's temporaries reuse the previous step's pages instead of new ones.
//
// XLA's CPU runtime allocates each step's temporary buffer (255 MB for U-Net base 64, batch 4,
// 128x128) at the start of the step and frees it at the end. glibc serves every block above
// 32 MiB (its largest mmap threshold) with a fresh mapping and unmaps it on free, so each step
// faulted in and zeroed its temporaries anew: 4.3% of the CPU time in the kernel's page clearing
// at base 64, and step times that varied by 10-15% (benchmarks/README.md, "Memory").
//
// Loaded with LD_PRELOAD by resunet_jax/hostmem.py when a command relaunches itself; it replaces
// malloc, free and the aligned allocators and passes everything to glibc (__libc_*) except, once
// switched on (resunet_keep_blocks(1), after setup), blocks of 32 MiB or more: freeing one keeps
// it (the larger of it and the block already kept, the other is freed), and a request of 32
// MiB or more takes the kept block when it is large enough and aligned, else frees the kept
// block and asks glibc. So at most one block is kept, it is never held beside a fresh large
// allocation made in its place, and every pointer handed out is glibc's own (realloc, calloc,
// malloc_usable_size work unchanged). The kept block is only reused by one allocation at a
// time, so allocations overlapping in time (JAX's asynchronous dispatch) get fresh blocks: the
// commands run JAX's CPU computations synchronously while this library is on.
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

extern void* __libc_malloc(size_t);
extern void __libc_free(void*);
extern void* __libc_memalign(size_t, size_t);

static const size_t kLarge = (size_t)32 << 20;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int on;
static void* kept;
static size_t kept_size;

// A process forked while another thread holds `mu` would find it held forever.
static void lock_for_fork(void) { pthread_mutex_lock(&mu); }
static void unlock_after_fork(void) { pthread_mutex_unlock(&mu); }
__attribute__((constructor)) static void install_fork_handlers(void) {
  pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork);
}

// Switches keeping on (1) or off (0, freeing the kept block); returns the previous setting.
int resunet_keep_blocks(int enable) {
  pthread_mutex_lock(&mu);
  int was = on;
  on = enable != 0;
  void* out = on ? NULL : kept;
  if (!on) kept = NULL;
  pthread_mutex_unlock(&mu);
  if (out) __libc_free(out);
  return was;
}

// The kept block if it serves `size` at `align`; NULL after freeing a kept block that does not.
static void* take(size_t size, size_t align) {
  void *p = NULL, *out = NULL;
  pthread_mutex_lock(&mu);
  if (on) {
    if (kept && kept_size >= size && (uintptr_t)kept % align == 0)
      p = kept;
    else
      out = kept;
    kept = NULL;
  }
  pthread_mutex_unlock(&mu);
  if (out) __libc_free(out);
  return p;
}

void free(void* p) {
  if (p == NULL) return;
  size_t usable = malloc_usable_size(p);
  if (usable >= kLarge) {
    pthread_mutex_lock(&mu);
    if (on) {
      void* out = p;
      if (kept == NULL || usable > kept_size) {
        out = kept;
        kept = p;
        kept_size = usable;
      }
      p = out;
    }
    pthread_mutex_unlock(&mu);
    if (p == NULL) return;
  }
  __libc_free(p);
}

void* malloc(size_t size) {
  void* p = size >= kLarge ? take(size, 16) : NULL;
  return p ? p : __libc_malloc(size);
}

void* memalign(size_t align, size_t size) {
  void* p = size >= kLarge ? take(size, align) : NULL;
  return p ? p : __libc_memalign(align, size);
}

void* aligned_alloc(size_t align, size_t size) { return memalign(align, size); }

int posix_memalign(void** out, size_t align, size_t size) {
  if (align % sizeof(void*) != 0 || (align & (align - 1)) != 0) return EINVAL;
  void* p = memalign(align, size);
  if (p == NULL) return ENOMEM;
  *out = p;
  return 0;
}

/* The core's running clock, for the trainer's CPU peak (trainer/perf.py). A chain of dependent
 * register-register adds retires one add per cycle on every x86-64 core, so 8n adds take 8n
 * cycles at the clock the core runs now (turbo included), whatever clock the OS reports. Adds of
 * an immediate would not do: newer Intel cores fold those in the renamer, several per cycle.
 * Elsewhere clock_probe_supported() is 0 and the trainer proves the clock with a GEMM instead. */
#include <stdint.h>

int clock_probe_supported(void) {
#if defined(__x86_64__)
    return 1;
#else
    return 0;
#endif
}

uint64_t clock_probe_chain(uint64_t n) {
    uint64_t x = 0, one = n | 1;
#if defined(__x86_64__)
    for (uint64_t i = 0; i < n; i++) {
        __asm__ volatile("add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\t"
                         "add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0" : "+r"(x) : "r"(one));
    }
#else
    (void)n;
#endif
    return x;
}

/*
 * ring_threads.c - ring_impl.c under ThreadSanitizer: one producer thread and
 * one consumer thread move COUNT sequence-numbered entries through a small
 * ring (so it wraps and fills thousands of times), with the eventfd notifier
 * attached and the consumer sleeping in poll() whenever the ring is empty.
 * Exits non-zero on a lost, duplicated, reordered or torn entry; TSan
 * reports any data race.  Built and run by tests/test_c_core.py.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>

#include "ring_impl.h"

#define SLOTS 17
#define COUNT 2000000ULL

static unsigned char memory[KC_HEADER_SIZE + SLOTS * KC_ENTRY_SIZE] __attribute__((aligned(8)));
static uint32_t signaled;
static kc_ring ring;

static void *producer(void *arg)
{
    (void)arg;
    for (uint64_t seq = 0; seq < COUNT;) {
        uint64_t data = ~seq;
        if (kc_ring_push(&ring, seq, &data, 8, seq & 1, 0) == KC_PUSH_OK) {
            if (kc_ring_notify_producer(&ring) < 0) {
                perror("notify");
                exit(2);
            }
            seq++;
        } else {
            sched_yield();
        }
    }
    return NULL;
}

int main(void)
{
    pthread_t thread;
    kc_entry batch[SLOTS];
    uint64_t expected = 0, sleeps = 0;
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);

    if (efd < 0 || kc_ring_init(&ring, memory, sizeof memory) != KC_OK) {
        fprintf(stderr, "setup failed\n");
        return 2;
    }
    kc_ring_set_notifier(&ring, efd, &signaled);
    pthread_create(&thread, NULL, producer, NULL);
    while (expected < COUNT) {
        int status;
        uint32_t bad, bad_index;
        size_t n = kc_ring_drain_into(&ring, batch, SLOTS, &status, &bad, &bad_index);
        if (status != KC_OK) {
            fprintf(stderr, "corrupt ring: status %d value %u slot %u\n", status, bad, bad_index);
            return 1;
        }
        for (size_t i = 0; i < n; i++, expected++) {
            uint64_t data;
            memcpy(&data, batch[i].data, 8);
            if (batch[i].phys_addr != expected || data != ~expected || batch[i].len != 8 ||
                batch[i].pio != (expected & 1)) {
                fprintf(stderr, "entry %llu wrong: addr %llu\n", (unsigned long long)expected,
                        (unsigned long long)batch[i].phys_addr);
                return 1;
            }
        }
        if (n == 0) {
            struct pollfd pfd = {.fd = efd, .events = POLLIN};
            if (kc_ring_notify_consumer_idle(&ring, 1) < 0)
                return 2;
            if (kc_ring_peek_first(&ring) == kc_ring_peek_last(&ring)) {
                sleeps++;
                if (poll(&pfd, 1, 10000) == 0) {
                    fprintf(stderr, "lost wakeup after %llu entries\n",
                            (unsigned long long)expected);
                    return 1;
                }
            }
        }
    }
    pthread_join(thread, NULL);
    printf("%llu entries in order, consumer slept %llu times\n", (unsigned long long)COUNT,
           (unsigned long long)sleeps);
    return 0;
}

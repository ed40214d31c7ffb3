/* counter_long.S - guests/counter.S with 1000 rounds: a guest that runs for seconds, for the
 * command-line tests of pykvm snapshot and pykvm migrate (which have no way to set RBX).
 * Mode: 64-bit long mode    Load: flat at GPA 0x100000, entry = first byte    Memory: at least 4 MiB
 * Exits: IoOut(port=0xE9) x15 a round, then DONE(0) (IoOut port=0xEA) */
#define COUNTER_ROUNDS	1000
#include "counter.S"

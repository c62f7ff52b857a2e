// Loops compiled for AVX-512 and AVX2 as well as the baseline and picked at load time (GCC
// function multiversioning on x86-64): selects and 16-bit conversions vectorise poorly with
// SSE2 alone. FUSEDRES_ISA_CLONES marks such a function; FUSEDRES_INLINE its helpers, so that
// each clone gets its own copy of them.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FUSEDRES_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FUSEDRES_INLINE inline __attribute__((always_inline))
#else
#define FUSEDRES_ISA_CLONES
#define FUSEDRES_INLINE inline
#endif

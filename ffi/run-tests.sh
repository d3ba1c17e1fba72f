#!/usr/bin/env bash
# Builds and runs the C API checks against target/release/libmultiworld.{so,a}:
#   - the header compiles as C11 and as C++17 with -Wall -Wextra -Werror -pedantic;
#   - the example and the tests link against the shared and the static library;
#   - the tests and the example run, then the tests run again built with AddressSanitizer and
#     UBSan, and once more under valgrind (every rank process checked, no memory errors, no
#     definite leaks).
# Usage (from the project root): ffi/run-tests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# The libraries as the default features build them (another build, with other features, may
# have replaced or removed them since).
cargo build --release --lib
lib=target/release
out=target/ctest
mkdir -p "$out"
flags=(-Wall -Wextra -Werror -pedantic -Iffi/include)

echo '#include "multiworld.h"
int main(void) { mwConfig_t c = MW_CONFIG_INITIALIZER; mwComm_t comm = 0; (void)c; return mwCommCount(comm, 0) == mwInvalidArgument ? 0 : 1; }' > "$out/header.cpp"
c++ -std=c++17 "${flags[@]}" -c "$out/header.cpp" -o "$out/header_cpp.o"
cc -std=c11 "${flags[@]}" -x c -c "$out/header.cpp" -o "$out/header_c.o"

cc -std=c11 -D_DEFAULT_SOURCE -O1 -g "${flags[@]}" ffi/tests/test_api.c -L"$lib" -lmultiworld -o "$out/test_api"
cc -std=c11 -D_DEFAULT_SOURCE -O2 "${flags[@]}" ffi/examples/allreduce.c -L"$lib" -lmultiworld -o "$out/allreduce"
# The same example linked statically (no LD_LIBRARY_PATH needed to run it).
cc -std=c11 -D_DEFAULT_SOURCE -O2 "${flags[@]}" ffi/examples/allreduce.c "$lib/libmultiworld.a" -lpthread -ldl -lm -o "$out/allreduce_static"

export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MW_LOG=off
timeout 300 "$out/test_api"
timeout 120 "$out/allreduce" 4
timeout 120 "$out/allreduce_static" 3
# The tests built with AddressSanitizer and UBSan: the C side's memory and arithmetic, and
# every libc copy the library makes on its behalf, checked as it runs.
cc -std=c11 -D_DEFAULT_SOURCE -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined \
    -fno-omit-frame-pointer "${flags[@]}" ffi/tests/test_api.c -L"$lib" -lmultiworld -o "$out/test_api_asan"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 timeout 300 "$out/test_api_asan"
timeout 900 valgrind -q --error-exitcode=9 --leak-check=full --errors-for-leak-kinds=definite \
    --trace-children=yes "$out/test_api"
echo "C API checks passed"

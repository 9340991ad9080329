#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| agentca::fuzz::access_file(data));

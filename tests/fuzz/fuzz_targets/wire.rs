#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pageserv_fuzz::wire(data));

//! Config text, as `outpost check-config`, SIGHUP and `config.apply` read
//! it: `config::parse_str` must return the checked config or an error that
//! names the problem, never panic. A config that passes is also rendered
//! the ways the agent renders it (warnings, the polkit rule).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::config;

fuzz_target!(|data: &[u8]| {
    // `Config::load` refuses text that is not UTF-8 before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::parse_str(text, "fuzz.toml") {
        Ok(cfg) => {
            let _ = cfg.render_warnings("fuzz.toml");
            let _ = outpost::polkit::render(&cfg, "outpost");
        }
        Err(e) => {
            // What check-config prints.
            let _ = e.to_string();
        }
    }
});

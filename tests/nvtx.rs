//! NVTX ranges reach the library's push/pop in nested order. Needs the
//! `nvtx` feature and a C compiler: it builds a stub NVTX library that logs
//! to a file, points `TUNEFUSE_NVTX_LIB` at it, and reads the log back.
//! `cargo test --features nvtx --test nvtx`
mod common;

use std::process::Command;

#[test]
fn ranges_reach_the_library_nested() {
    let scratch = common::scratch("nvtx");
    let dir = scratch.path();
    let (src, lib, log) = (
        dir.join("stub.c"),
        dir.join("libstub.so"),
        dir.join("log.txt"),
    );
    std::fs::write(
        &src,
        format!(
            r#"#include <stdio.h>
static void put(const char* s) {{ FILE* f = fopen("{}", "a"); fputs(s, f); fputs("\n", f); fclose(f); }}
int nvtxRangePushA(const char* m) {{ put(m); return 0; }}
int nvtxRangePop(void) {{ put("pop"); return 0; }}
"#,
            log.display()
        ),
    )
    .unwrap();
    let ok = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .status()
        .unwrap();
    assert!(ok.success(), "cannot build the stub NVTX library");
    std::env::set_var("TUNEFUSE_NVTX_LIB", &lib);
    let outer = tunefuse::nvtx::range("outer");
    {
        let _inner = tunefuse::nvtx::range("inner");
    }
    drop(outer);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "outer\ninner\npop\npop\n"
    );
}

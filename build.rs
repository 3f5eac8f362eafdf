//! Compiles the vendored CRIU image protos and pageserv's own control messages with protox,
//! so building needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let criu = [
        "pagemap.proto",
        "pstree.proto",
        "mm.proto",
        "inventory.proto",
        "core.proto",
        "img-streamer.proto",
    ];
    let files: Vec<String> = criu
        .iter()
        .map(|f| format!("proto/criu/{f}"))
        .chain(std::iter::once("proto/pageserv.proto".to_string()))
        .collect();
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-changed=proto/criu");
    let fds = protox::compile(&files, ["proto/criu", "proto"])?;
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    Ok(())
}

//! Compiles proto/dynseg/v1/*.proto with protox (a pure-Rust protobuf compiler),
//! so no machine needs protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "dynseg/v1/common.proto",
        "dynseg/v1/events.proto",
        "dynseg/v1/changes.proto",
        "dynseg/v1/node.proto",
        "dynseg/v1/control.proto",
        "dynseg/v1/gateway.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed=../../proto/{file}");
    }
    let descriptors = protox::compile(files, ["../../proto"])?;
    tonic_prost_build::configure()
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}

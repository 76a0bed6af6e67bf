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
    // The encoded descriptors, for gRPC server reflection.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("dynseg_v1_descriptors.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}

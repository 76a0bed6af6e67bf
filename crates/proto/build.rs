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
        .compile_fds(descriptors.clone())?;
    // The node's and the gateway's services once more, with the messages that
    // carry events or changes swapped for ones that keep each encoded (module
    // `encoded`): the same bytes on the wire, no decoding into owned strings
    // and maps on the way in, no encoding again on the way on.
    let mut services = descriptors;
    for file in &mut services.file {
        if !matches!(
            file.name(),
            "dynseg/v1/node.proto" | "dynseg/v1/gateway.proto"
        ) {
            file.service.clear();
        }
    }
    let encoded_out = out.join("encoded");
    std::fs::create_dir_all(&encoded_out)?;
    tonic_prost_build::configure()
        .out_dir(&encoded_out)
        .extern_path(".dynseg.v1", "crate::pb")
        .extern_path(".dynseg.v1.EventBatch", "crate::encoded::EventBatch")
        .extern_path(".dynseg.v1.ShardBatches", "crate::encoded::ShardBatches")
        .extern_path(".dynseg.v1.IngestRequest", "crate::encoded::IngestRequest")
        .extern_path(".dynseg.v1.ChangeBatch", "crate::encoded::ChangeBatch")
        .extern_path(".dynseg.v1.GatewayChange", "crate::encoded::GatewayChange")
        .extern_path(
            ".dynseg.v1.MembershipChange",
            "crate::encoded::EncodedChange",
        )
        .compile_fds(services)?;
    Ok(())
}

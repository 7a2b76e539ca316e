include!("../ingestor/build.rs");

//! Prints the ArrowportStream CRD as YAML; `crds/arrowportstreams.arrowport.dev.yaml` is its output.

fn main() {
    print!("{}", arrowport_operator::crd_yaml());
}

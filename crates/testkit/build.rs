fn main() {
    facerec_torch_link::emit();
}

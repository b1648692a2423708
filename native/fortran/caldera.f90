! Fortran bindings of Caldera's native inference library (native/include/caldera.h), through ISO_C_BINDING.
!
!   use caldera
!   type(caldera_model) :: model
!   real(real32) :: x(32, 32, 2, nb), y(32, 32, 1, nb)
!   if (caldera_load(model, "runs/heat/export", "cpu") /= CALDERA_OK) error stop caldera_last_error()
!   if (caldera_run(model, x, y) /= CALDERA_OK) print *, caldera_last_error()
!   if (caldera_metadata(model, "caldera.data.steps", text) == CALDERA_OK) read(text, *) steps
!   call caldera_free(model)
!
! A Fortran array is column-major: x(32,32,2,nb) has the same memory as the C array (nb,2,32,32), so the shape
! passed to C is the Fortran shape reversed and no element is copied.
module caldera
  use, intrinsic :: iso_c_binding
  implicit none
  private

  public :: caldera_model, caldera_load, caldera_run, caldera_last_error, caldera_free, caldera_input_shape, &
            caldera_output_shape, caldera_metadata
  public :: CALDERA_OK, CALDERA_ERR_ARG, CALDERA_ERR_LOAD, CALDERA_ERR_SHAPE, CALDERA_ERR_DTYPE, CALDERA_ERR_DEVICE, &
            CALDERA_ERR_RUN

  integer, parameter :: CALDERA_OK = 0, CALDERA_ERR_ARG = 1, CALDERA_ERR_LOAD = 2, CALDERA_ERR_SHAPE = 3, &
                        CALDERA_ERR_DTYPE = 4, CALDERA_ERR_DEVICE = 5, CALDERA_ERR_RUN = 6
  integer, parameter :: MAX_NDIM = 8

  !> A loaded model; free it with caldera_free.
  type :: caldera_model
    type(c_ptr) :: handle = c_null_ptr
  end type caldera_model

  !> Run a model on one input array and write its first output: real32 or real64 arrays of any rank (the input and
  !> output ranks may differ: atoms(3, n, nb) -> energy(nb)). Assumed-rank dummies (Fortran 2018) take them all.
  interface caldera_run
    module procedure caldera_run_r32, caldera_run_r64
  end interface caldera_run

  interface
    function c_load(path, device, out) bind(c, name="caldera_load") result(status)
      import :: c_char, c_ptr, c_int
      character(kind=c_char), intent(in) :: path(*), device(*)
      type(c_ptr), intent(out) :: out
      integer(c_int) :: status
    end function c_load
    function c_run(m, x, x_shape, x_ndim, x_dtype, y, y_shape, y_ndim, y_dtype) bind(c, name="caldera_run") &
        result(status)
      import :: c_ptr, c_int, c_int64_t
      type(c_ptr), value :: m, x, y
      integer(c_int64_t), intent(in) :: x_shape(*), y_shape(*)
      integer(c_int), value :: x_ndim, x_dtype, y_ndim, y_dtype
      integer(c_int) :: status
    end function c_run
    function c_input_shape(m, i, shape, ndim) bind(c, name="caldera_input_shape") result(status)
      import :: c_ptr, c_int, c_int64_t
      type(c_ptr), value :: m
      integer(c_int), value :: i
      integer(c_int64_t), intent(out) :: shape(*)
      integer(c_int), intent(out) :: ndim
      integer(c_int) :: status
    end function c_input_shape
    function c_output_shape(m, i, shape, ndim) bind(c, name="caldera_output_shape") result(status)
      import :: c_ptr, c_int, c_int64_t
      type(c_ptr), value :: m
      integer(c_int), value :: i
      integer(c_int64_t), intent(out) :: shape(*)
      integer(c_int), intent(out) :: ndim
      integer(c_int) :: status
    end function c_output_shape
    function c_metadata(m, key, buf, len) bind(c, name="caldera_metadata") result(status)
      import :: c_ptr, c_char, c_int, c_int64_t
      type(c_ptr), value :: m, buf
      character(kind=c_char), intent(in) :: key(*)
      integer(c_int64_t), intent(inout) :: len
      integer(c_int) :: status
    end function c_metadata
    function c_last_error() bind(c, name="caldera_last_error") result(message)
      import :: c_ptr
      type(c_ptr) :: message
    end function c_last_error
    subroutine c_free(m) bind(c, name="caldera_free")
      import :: c_ptr
      type(c_ptr), value :: m
    end subroutine c_free
    function c_strlen(s) bind(c, name="strlen") result(n)
      import :: c_ptr, c_size_t
      type(c_ptr), value :: s
      integer(c_size_t) :: n
    end function c_strlen
  end interface

contains

  !> Load an export directory, a .pt2 AOTInductor package or a .ts TorchScript file on "cpu", "cuda" or "cuda:N".
  function caldera_load(model, path, device) result(status)
    type(caldera_model), intent(inout) :: model
    character(len=*), intent(in) :: path
    character(len=*), intent(in), optional :: device
    integer :: status
    if (present(device)) then
      status = c_load(trim(path) // c_null_char, trim(device) // c_null_char, model%handle)
    else
      status = c_load(trim(path) // c_null_char, "cpu" // c_null_char, model%handle)
    end if
  end function caldera_load

  !> The message of the last failure on this thread.
  function caldera_last_error() result(message)
    character(len=:), allocatable :: message
    type(c_ptr) :: p
    character(kind=c_char), pointer :: chars(:)
    integer :: i, n
    p = c_last_error()
    n = int(c_strlen(p))
    call c_f_pointer(p, chars, [n])
    allocate(character(len=n) :: message)
    do i = 1, n
      message(i:i) = chars(i)
    end do
  end function caldera_last_error

  !> Release a model (a model never loaded is ignored).
  subroutine caldera_free(model)
    type(caldera_model), intent(inout) :: model
    call c_free(model%handle)
    model%handle = c_null_ptr
  end subroutine caldera_free

  !> The recorded shape of input i (from 1) in Fortran order (the C shape reversed; -1 = any batch).
  function caldera_input_shape(model, i, shape) result(status)
    type(caldera_model), intent(in) :: model
    integer, intent(in) :: i
    integer(c_int64_t), allocatable, intent(out) :: shape(:)
    integer :: status
    integer(c_int64_t) :: s(MAX_NDIM)
    integer(c_int) :: n
    n = 0
    status = c_input_shape(model%handle, int(i - 1, c_int), s, n)
    shape = s(n:1:-1)
  end function caldera_input_shape

  !> The recorded shape of output i (from 1) in Fortran order.
  function caldera_output_shape(model, i, shape) result(status)
    type(caldera_model), intent(in) :: model
    integer, intent(in) :: i
    integer(c_int64_t), allocatable, intent(out) :: shape(:)
    integer :: status
    integer(c_int64_t) :: s(MAX_NDIM)
    integer(c_int) :: n
    n = 0
    status = c_output_shape(model%handle, int(i - 1, c_int), s, n)
    shape = s(n:1:-1)
  end function caldera_output_shape

  !> The package metadata value of key, e.g. "caldera.data.steps" (what `caldera export` recorded); a key the
  !> package lacks is CALDERA_ERR_ARG and value is "".
  function caldera_metadata(model, key, value) result(status)
    type(caldera_model), intent(in) :: model
    character(len=*), intent(in) :: key
    character(len=:), allocatable, intent(out) :: value
    integer :: status
    character(kind=c_char), allocatable, target :: buf(:)
    integer(c_int64_t) :: n
    integer :: i
    value = ""
    n = 0
    ! The first call asks the value's length, the second copies it.
    status = c_metadata(model%handle, trim(key) // c_null_char, c_null_ptr, n)
    if (n < 0) return
    allocate(buf(n + 1))
    n = n + 1
    status = c_metadata(model%handle, trim(key) // c_null_char, c_loc(buf), n)
    if (status /= CALDERA_OK) return
    value = repeat(" ", int(n))
    do i = 1, int(n)
      value(i:i) = buf(i)
    end do
  end function caldera_metadata

  function run_raw(model, x, x_shape, x_dtype, y, y_shape, y_dtype) result(status)
    type(caldera_model), intent(in) :: model
    type(c_ptr), intent(in) :: x, y
    integer(c_int64_t), intent(in) :: x_shape(:), y_shape(:)
    integer, intent(in) :: x_dtype, y_dtype
    integer :: status
    integer(c_int64_t) :: xs(MAX_NDIM), ys(MAX_NDIM)
    integer :: nx, ny
    nx = size(x_shape)
    ny = size(y_shape)
    ! Column-major (n1, ..., nk) is row-major (nk, ..., n1): the same memory, the shape reversed.
    xs(1:nx) = x_shape(nx:1:-1)
    ys(1:ny) = y_shape(ny:1:-1)
    status = c_run(model%handle, x, xs, int(nx, c_int), int(x_dtype, c_int), y, ys, int(ny, c_int), &
                   int(y_dtype, c_int))
  end function run_raw

  function caldera_run_r32(model, x, y) result(status)
    type(caldera_model), intent(in) :: model
    real(c_float), intent(in), target, contiguous :: x(..)
    real(c_float), intent(inout), target, contiguous :: y(..)
    integer :: status
    status = run_raw(model, c_loc(x), shape(x, kind=c_int64_t), 0, c_loc(y), shape(y, kind=c_int64_t), 0)
  end function caldera_run_r32

  function caldera_run_r64(model, x, y) result(status)
    type(caldera_model), intent(in) :: model
    real(c_double), intent(in), target, contiguous :: x(..)
    real(c_double), intent(inout), target, contiguous :: y(..)
    integer :: status
    status = run_raw(model, c_loc(x), shape(x, kind=c_int64_t), 1, c_loc(y), shape(y, kind=c_int64_t), 1)
  end function caldera_run_r64

end module caldera
